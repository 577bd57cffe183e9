"""dreambooth_lib: the library behind the DreamBooth course notebooks.

Start with `environment.environment_report()`, `models.load_components()` and `models.build_pipeline()`.
"""

__version__ = "0.1.0"
