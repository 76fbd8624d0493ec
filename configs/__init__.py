"""Recipes (YAML): loss defaults with their papers, and one file per teacher-student pair; shipped as kdcache.configs."""
