"""lrdeploy.layers."""
