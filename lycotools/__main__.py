"""``python -m lycotools ...`` and ``accelerate launch -m lycotools train ...``."""

from .cli import main

if __name__ == "__main__":
    main()
