"""Named recipes: Python functions returning job configs (see :mod:`.pretrain`)."""

from qmath_megatron.recipes.pretrain import RECIPES, get_recipe

__all__ = ["RECIPES", "get_recipe"]
