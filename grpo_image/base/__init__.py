"""The ground floor: recipes and their defaults, run logging, image folders. Imports nothing of the package."""
