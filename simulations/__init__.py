"""fedfusion simulations package."""
