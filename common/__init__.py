"""Code shared by the FedCT server and hospital clients: configuration, DICOM reading,
preprocessing, augmentation, models, metrics and Grad-CAM."""
