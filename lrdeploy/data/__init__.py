"""lrdeploy.data."""
