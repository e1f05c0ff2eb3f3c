"""fedfusion server package."""
