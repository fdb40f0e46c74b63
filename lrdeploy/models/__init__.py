"""lrdeploy.models."""
