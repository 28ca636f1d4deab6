"""Offline translation to English with Argos Translate: packages, language detection, the stage, the demo model."""

from newsclip.translate.detect import detect, resolve_lang
from newsclip.translate.packages import (
    MissingLanguagePackageError,
    argos_env,
    install_packages,
    installed_pairs,
    require_packages,
)
from newsclip.translate.translator import TranslateConfig, TranslationCache, Translator

__all__ = [
    "MissingLanguagePackageError", "TranslateConfig", "TranslationCache", "Translator", "argos_env",
    "build_demo_translator", "detect", "install_packages", "installed_pairs", "require_packages", "resolve_lang",
]


def build_demo_translator(*args, **kwargs):
    """See `newsclip.translate.demo_translator.build_demo_translator` (imported on use: it pulls in the demo)."""
    from newsclip.translate.demo_translator import build_demo_translator as build

    return build(*args, **kwargs)
