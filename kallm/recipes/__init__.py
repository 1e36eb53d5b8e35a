"""Recipes: whole jobs built from the layers below: the demo, the research experiment, the classification sweep."""
