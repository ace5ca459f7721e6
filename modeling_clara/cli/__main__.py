"""`python -m modeling_clara.cli ...`: the `clara` command, also as the module torchrun or accelerate launch runs."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
