"""`python -m kitstrain` (what `torchrun ... -m kitstrain fit ...` runs)."""

from kitstrain.cli import main

if __name__ == "__main__":
    main()
