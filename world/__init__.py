"""The synthetic world, where EpmVG runs end to end on a laptop: scenes, their dataset, recipe, the toy CLIP and toy
detectors, and their preparation. The method's files never import it; data.make_dataset and machinery/recipes.py reach
it for --dataset shapes only. docs/synthetic_world.md has the evidence."""
