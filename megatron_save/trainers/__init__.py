"""Training stages: 1 (Bradley-Terry), 2 (value anchor); each loop composes pieces from the package."""
