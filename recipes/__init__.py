"""Recipes: one readable script per workflow, built from engine/ and trainer/ components."""
