"""Variant recipes, registered by name: one module per precision behind :class:`~.base.Recipe`.

``REGISTRY`` holds the built-in recipes in dependency order (a recipe's ``needs`` come before it); ``tcsched
build`` builds every registered recipe unless ``--variants`` names some. A new precision is a module with a
:class:`~.base.Recipe` subclass and one line below (its name also goes into :data:`tcsched.precision.Precision`
for the manifest).
"""

from __future__ import annotations

from tcsched.build_tools.recipes.base import (
    BuildContext,
    BuiltVariant,
    Dropped,
    Recipe,
    RecipeRegistry,
)
from tcsched.build_tools.recipes.fp16 import Fp16
from tcsched.build_tools.recipes.fp32 import Fp32
from tcsched.build_tools.recipes.int8 import Int8
from tcsched.build_tools.recipes.int8_mixed import Int8Mixed
from tcsched.build_tools.recipes.sparse24 import Sparse24

REGISTRY = RecipeRegistry()
REGISTRY.register(Fp32())
REGISTRY.register(Fp16())
REGISTRY.register(Int8())
REGISTRY.register(Int8Mixed())
REGISTRY.register(Sparse24())

__all__ = ["REGISTRY", "BuildContext", "BuiltVariant", "Dropped", "Recipe", "RecipeRegistry"]
