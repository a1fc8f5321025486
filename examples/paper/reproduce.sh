#!/usr/bin/env bash
# The paper's recipe (SAVE, arXiv 2605.30888) in one command, from Hugging Face checkpoints to Table 1 and to the
# policy answers of Table 3, on one node:
#   bash examples/paper/reproduce.sh
#   ROWS="save hl_bt" STEPS=100 WORK=work/short bash examples/paper/reproduce.sh
#   DRY_RUN=1 bash examples/paper/reproduce.sh        # print every command instead of running it
# Steps: convert the policies and the RM -> F.1's prompt selection from UltraFeedback -> the matched
# ultrafeedback_binarized pairs -> per policy: K responses per prompt, stage 2 on the RM itself (one value head per
# policy), stage 3 for each row -> the six RM benchmarks (tools/eval_rm.py) -> $WORK/tables/table1.md, and the
# policy answers for AlpacaEval 2 and Arena-Hard-v2.0 under $WORK/answers/<row>/<policy>/ with
# $WORK/tables/table3.md saying where (their GPT judges run elsewhere).
# A relaunch continues: a step whose output is complete ($WORK/.done/<step>) is skipped, a stage-3 row that
# stopped part-way resumes from its run checkpoint, a step that stopped part-way otherwise starts again.
set -euo pipefail

# ---- settings: the paper's values by default --------------------------------------------------------------------
GPUS=${GPUS:-4}                 # processes per launch: the paper's one node of 4 GPUs
TP=${TP:-2}                     # tensor-parallel size of every model (stage3_save.yaml's 2)
PP=${PP:-1}                     # pipeline-parallel size of every model
WORK=${WORK:-work/paper}        # everything this script writes
POLICY_HF=${POLICY_HF:-"Qwen/Qwen2.5-3B-Instruct Qwen/Qwen3-4B-Instruct-2507"}   # space-separated, 6.1's two
RM_HF=${RM_HF:-Skywork/Skywork-Reward-V2-Llama-3.2-3B}                            # 6.1's initial RM
PROMPT_DATA=${PROMPT_DATA:-openbmb/UltraFeedback}                   # instruction, completions[].response
PREFERENCE_DATA=${PREFERENCE_DATA:-HuggingFaceH4/ultrafeedback_binarized}   # prompt, chosen / rejected messages
MIN_RESPONSE_TOKENS=${MIN_RESPONSE_TOKENS:-1024}   # F.1: instructions whose responses exceed 1024 tokens
BENCHMARK_DIR=${BENCHMARK_DIR:-data/benchmarks}    # reward-bench/filtered, reward-bench-2/test, RM-Bench/total_dataset,
  # ppe/human_preference_v1, ppe/correctness/ (one file per set), judgebench/gpt, alpaca_eval/alpaca_eval,
  # arena-hard-v2.0/question: each .parquet, .jsonl or .json (README's evaluation example)
STEPS=${STEPS:-320}             # Table 8: T
K=${K:-16}                      # F.1: responses per prompt for stage 2
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}   # Table 8, also the answers' limit
MAX_LENGTH=${MAX_LENGTH:-2048}  # reward-model tokens of a conversation (stages 2-3, benchmarks: reward-bench's)
DTYPE=${DTYPE:-bf16}            # checkpoints converted from HF
ALL_ROWS="initial offline_bt mean_reward hl_bt save save_no_curriculum save_frozen_policy grpo reinforce_pp improved_rm r2m prime"
ROWS=${ROWS:-$ALL_ROWS}         # a subset of ALL_ROWS (improved_rm brings save along)
EXTRA_ARGS=${EXTRA_ARGS:-}      # key=value for every stage-3 run
SAMPLE_ARGS=${SAMPLE_ARGS:-}    # key=value for sample-responses
STAGE2_ARGS=${STAGE2_ARGS:-}    # key=value for stage 2
EVAL_ARGS=${EVAL_ARGS:-}        # flags for tools/eval_rm.py (e.g. --batch-size 16)
ANSWER_ARGS=${ANSWER_ARGS:-}    # flags for tools/export_policy_answers.py (e.g. --batch-size 32)
DRY_RUN=${DRY_RUN:-}            # non-empty: print the commands, run nothing

# ---- helpers -------------------------------------------------------------------------------------------------------
launch=(torchrun --standalone --nproc-per-node "$GPUS")
if [ "$GPUS" = 1 ]; then launch=(python); fi   # a world of one needs no launcher (and starts 2 s sooner)
layout=(parallel.tensor_model_parallel_size="$TP" parallel.pipeline_model_parallel_size="$PP")
say() { echo "[reproduce $(date +%H:%M:%S)] $*"; }
run() { if [ -n "$DRY_RUN" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
# step NAME OUTPUT KEEP COMMAND...: runs COMMAND unless NAME is done. A partial OUTPUT of an earlier launch is
# removed first (the tools refuse a non-empty one), unless OUTPUT/KEEP exists: then COMMAND continues it (stage 3
# from its run checkpoint, sample-responses from its rows). KEEP "-": always start again.
step() {
  local name=$1 output=$2 keep=$3
  shift 3
  if [ -z "$DRY_RUN" ] && [ -e "$WORK/.done/$name" ]; then say "$name: done, skipped"; return; fi
  say "$name"
  if [ -z "$DRY_RUN" ] && { [ "$keep" = - ] || [ ! -e "$output/$keep" ]; }; then rm -rf "$output"; fi
  run "$@"
  if [ -z "$DRY_RUN" ]; then mkdir -p "$WORK/.done" && touch "$WORK/.done/$name"; fi
}
wanted() { [[ " $ROWS " == *" $1 "* ]]; }
# bench_data PATH: the benchmark file PATH.parquet, .jsonl or .json under BENCHMARK_DIR (or the directory PATH)
bench_data() {
  local base=$BENCHMARK_DIR/$1 suffix
  if [ -d "$base" ]; then echo "$base"; return; fi
  for suffix in parquet jsonl json; do
    if [ -e "$base.$suffix" ]; then echo "$base.$suffix"; return; fi
  done
  if [ -n "$DRY_RUN" ]; then echo "$base.parquet"; return; fi
  echo "reproduce.sh: no $base.parquet, .jsonl, .json or directory (BENCHMARK_DIR=$BENCHMARK_DIR)" >&2
  exit 1
}
wanted_any() { local row; for row in "$@"; do wanted "$row" && return 0; done; return 1; }

for row in $ROWS; do
  [[ " $ALL_ROWS " == *" $row "* ]] || { echo "reproduce.sh: unknown row '$row' in ROWS; rows: $ALL_ROWS" >&2; exit 1; }
done
if wanted improved_rm && ! wanted save; then ROWS="$ROWS save"; say "improved_rm trains against save's RM: save added"; fi
read -r -a policies <<< "$POLICY_HF"
[ "${#policies[@]}" -gt 0 ] || { echo "reproduce.sh: POLICY_HF is empty" >&2; exit 1; }
name_of() { basename "$1"; }
first_policy=$(name_of "${policies[0]}")
names=()
for hf in "${policies[@]}"; do
  [[ " ${names[*]} " != *" $(name_of "$hf") "* ]] || { echo "reproduce.sh: two policies named $(name_of "$hf")" >&2; exit 1; }
  names+=("$(name_of "$hf")")
done
# Every input file is looked up now, before hours of training.
benchmarks=()
if wanted_any initial offline_bt mean_reward hl_bt save save_no_curriculum save_frozen_policy; then
  for spec in rewardbench:reward-bench/filtered rewardbench2:reward-bench-2/test rm-bench:RM-Bench/total_dataset \
              ppe-preference:ppe/human_preference_v1 ppe-correctness:ppe/correctness judgebench:judgebench/gpt; do
    data=$(bench_data "${spec#*:}")
    benchmarks+=(--benchmark "${spec%%:*}" --data "$data")
  done
fi
if wanted_any initial grpo reinforce_pp prime r2m save improved_rm; then
  alpaca_prompts=$(bench_data alpaca_eval/alpaca_eval)
  arena_prompts=$(bench_data arena-hard-v2.0/question)
fi
[ -n "$DRY_RUN" ] || mkdir -p "$WORK"

# ---- 1. checkpoints and data -----------------------------------------------------------------------------------
for hf in "${policies[@]}"; do
  p=$(name_of "$hf")
  step "convert_$p" "$WORK/models/$p" - \
    python tools/convert_hf_to_megatron.py --hf-dir "$hf" --out "$WORK/models/$p" --dtype "$DTYPE"
done
step convert_rm "$WORK/models/rm" - \
  python tools/convert_hf_to_megatron.py --hf-dir "$RM_HF" --out "$WORK/models/rm" --dtype "$DTYPE"
# F.1's prompts, counted in the first policy's tokens (tools/select_prompts.py says why --rule any).
step select_prompts "$WORK/data/prompts.jsonl" - \
  python tools/select_prompts.py --data "$PROMPT_DATA" --tokenizer "${policies[0]}" \
  --min-response-tokens "$MIN_RESPONSE_TOKENS" --out "$WORK/data/prompts.jsonl"
if wanted offline_bt; then
  step offline_pairs "$WORK/data/offline_pairs.jsonl" - \
    python tools/offline_pairs.py --prompts "$WORK/data/prompts.jsonl" --pairs "$PREFERENCE_DATA" \
    --out "$WORK/data/offline_pairs.jsonl"
fi

# ---- 2. per policy: stage 2 on the RM itself, then stage 3 per row ------------------------------------------------
no_rollout_update="reward.update_skips_truncated=false"   # strategies that do not learn from the responses
for hf in "${policies[@]}"; do
  p=$(name_of "$hf")
  step "sample_$p" "$WORK/$p/responses" responses.jsonl \
    "${launch[@]}" -m megatron_save sample-responses examples/paper/sample_responses.yaml \
    checkpoint="$WORK/models/$p" prompt_data="$WORK/data/prompts.jsonl" output_dir="$WORK/$p/responses" \
    rollout.sampling.n="$K" rollout.sampling.max_new_tokens="$MAX_NEW_TOKENS" "${layout[@]}" $SAMPLE_ARGS
  anchored="$WORK/$p/rm_value_anchored"
  step "stage2_$p" "$anchored" - \
    "${launch[@]}" -m megatron_save stage2 examples/paper/stage2_value_anchor.yaml \
    checkpoint="$WORK/models/rm" output_dir="$anchored" data.train_data="$WORK/$p/responses/responses.jsonl" \
    data.max_length="$MAX_LENGTH" "${layout[@]}" $STAGE2_ARGS
  # Rows in this order (improved_rm reads save's RM); the policy-independent offline_bt runs with the first policy.
  for row in offline_bt mean_reward hl_bt save save_no_curriculum save_frozen_policy grpo reinforce_pp improved_rm \
             r2m prime; do
    wanted "$row" || continue
    [ "$row" = offline_bt ] && [ "$p" != "$first_policy" ] && continue
    overlays=() reward="$anchored"
    case "$row" in
      save | save_no_curriculum | mean_reward | hl_bt) settings=(reward.strategy="$row") ;;
      save_frozen_policy) settings=(reward.strategy=save policy.frozen=true) ;;
      offline_bt) settings=(reward.strategy=offline_bt reward.offline_data="$WORK/data/offline_pairs.jsonl"
                            "$no_rollout_update") ;;
      grpo) settings=(reward.strategy=frozen "$no_rollout_update") ;;
      reinforce_pp) overlays=(examples/algorithms/reinforce_pp.yaml)
                    settings=(reward.strategy=frozen "$no_rollout_update") ;;
      improved_rm) reward="$WORK/$p/save/reward_model"   # a fresh GRPO policy against the RM SAVE produced
                   settings=(reward.strategy=frozen "$no_rollout_update") ;;
      r2m) settings=(reward.strategy=r2m reward.optim.lr=1e-6 "$no_rollout_update") ;;   # R2M's head LR
      # PRIME: RLOO advantages; the implicit PRM starts from the policy, its labels from the frozen RM.
      prime) settings=(reward.strategy=prime policy.advantage=rloo reward.prime.optim.use_distributed_optimizer=true) ;;
    esac
    step "stage3_${p}_$row" "$WORK/$p/$row" checkpoints/latest \
      "${launch[@]}" -m megatron_save stage3 examples/paper/stage3_save.yaml "${overlays[@]}" \
      output_dir="$WORK/$p/$row" train_data="$WORK/data/prompts.jsonl" policy.checkpoint="$WORK/models/$p" \
      reward.checkpoint="$reward" total_steps="$STEPS" rollout.sampling.max_new_tokens="$MAX_NEW_TOKENS" \
      reward.max_length="$MAX_LENGTH" "${layout[@]}" "${settings[@]}" $EXTRA_ARGS
  done
done

# ---- 3. Table 1: the six RM benchmarks of every trained RM ----------------------------------------------------------
evaluate() {  # evaluate NAME CKPT OUT
  step "eval_$1" "$3" - "${launch[@]}" tools/eval_rm.py --ckpt "$2" --tp "$TP" --pp "$PP" --out "$3" \
    --max-length "$MAX_LENGTH" "${benchmarks[@]}" $EVAL_ARGS
}
wanted initial && evaluate initial "$WORK/models/rm" "$WORK/eval/initial"
wanted offline_bt && evaluate offline_bt "$WORK/$first_policy/offline_bt/reward_model" "$WORK/eval/offline_bt"
for hf in "${policies[@]}"; do
  p=$(name_of "$hf")
  for row in mean_reward hl_bt save save_no_curriculum save_frozen_policy; do
    wanted "$row" && evaluate "${p}_$row" "$WORK/$p/$row/reward_model" "$WORK/eval/$p/$row"
  done
done

# ---- 4. Table 3: policy answers for AlpacaEval 2 and Arena-Hard-v2.0 ------------------------------------------------
for hf in "${policies[@]}"; do
  p=$(name_of "$hf")
  for row in initial grpo reinforce_pp prime r2m save improved_rm; do
    wanted "$row" || continue
    answers="$WORK/answers/$row/$p"
    policy=(--hf-model "$hf")   # initial: the instruct policy before RL (the paper's SFT row)
    if [ "$row" != initial ]; then   # the row's policy, kept in HF format too
      policy=(--ckpt "$WORK/$p/$row/policy" --hf-out "$WORK/hf/$p/$row")
      [ -n "$DRY_RUN" ] || [ -e "$WORK/.done/answers_${p}_$row" ] || rm -rf "$WORK/hf/$p/$row"
    fi
    step "answers_${p}_$row" "$answers" - \
      python tools/export_policy_answers.py "${policy[@]}" --model-name "$p-$row" \
      --max-new-tokens "$MAX_NEW_TOKENS" \
      --benchmark alpaca_eval --prompts "$alpaca_prompts" --out "$answers/model_outputs.json" \
      --benchmark arena_hard --prompts "$arena_prompts" --out "$answers/model_answer/$p-$row.jsonl" $ANSWER_ARGS
  done
done

# ---- 5. the tables (always rebuilt from what is on disk) -----------------------------------------------------------
run python tools/paper_tables.py --work "$WORK" --rm-name "$(name_of "$RM_HF")" --policies "${names[@]}" \
  --rows $ROWS --out "$WORK/tables"
say "done: $WORK/tables/table1.md, $WORK/tables/table3.md"
