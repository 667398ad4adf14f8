"""The hospital side of FedCT: local (DP) training, the privacy ledger, the Flower ClientApp."""
