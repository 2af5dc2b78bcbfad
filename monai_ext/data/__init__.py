"""Data: downloads (``download``, ``base``), one module per dataset, pair sampling (``pairs``), synthesis and augmentation."""
