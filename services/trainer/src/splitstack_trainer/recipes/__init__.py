"""Built-in recipes: a name for a LightningModule + LightningDataModule pair and their defaults.

A job names either a recipe or its own `module` and `datamodule` import paths; a recipe is only a
shorthand for the latter, so recipes run through exactly the path user code takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    """A named module/datamodule pair and the hyperparameters it defaults to."""

    name: str
    module: str
    datamodule: str
    description: str
    defaults: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe for recipe in (
        Recipe("digits-mlp", "splitstack_trainer.recipes.digits:DigitsMLP",
               "splitstack_trainer.recipes.digits:DigitsDataModule",
               "MLP 64-1024-1024-10 on 8x8 digits: matmul-heavy, where INT8 pays off"),
        Recipe("digits-cnn", "splitstack_trainer.recipes.digits:DigitsCNN",
               "splitstack_trainer.recipes.digits:DigitsDataModule",
               "tiny CNN (two 3x3 convolutions) on 8x8 digits: where INT8 does not pay off"),
    )
}
