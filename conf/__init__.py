"""Hydra configuration tree (YAML files), shipped as package data."""
