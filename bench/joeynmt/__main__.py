"""python -m bench.joeynmt {train-speed,train,translate-speed} CONFIG [...]: see bench/joeynmt/__init__.py."""

from bench.joeynmt.commands import main

if __name__ == "__main__":
    main()
