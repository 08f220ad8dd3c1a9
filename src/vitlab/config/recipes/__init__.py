"""Training recipes: YAML presets shipped with vitlab, one per architecture family.

``vitlab train --recipe cct`` starts from ``cct.yaml`` and applies the command line on top; the
run's ``config.yaml`` then records every value used, the recipe's name included. Each file says
where its values come from. The schedules are the papers' (hundreds of epochs); pass
``--epochs`` for a shorter run, which keeps the warm-up and cosine shape.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import unknown_name_error
from ..train import TrainConfig, load_config

RECIPE_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    """The names of the shipped recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe ``name``; an unknown name gets one line listing the recipes."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name_error("recipe", name, list_recipes(), hint=f"(recipes: {', '.join(list_recipes())})")
    return path


def load_recipe(name: str) -> TrainConfig:
    """The config of recipe ``name``, with ``recipe`` set to the name."""
    cfg = load_config(recipe_path(name))
    cfg.recipe = name
    return cfg


__all__ = ["RECIPE_DIR", "list_recipes", "load_recipe", "recipe_path"]
