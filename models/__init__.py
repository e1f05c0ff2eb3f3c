"""Networks, losses, metrics and the training/evaluation loop shared by client, server and simulations."""
