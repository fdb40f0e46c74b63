"""lrdeploy.methods."""
