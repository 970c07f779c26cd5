from .cli import main

if __name__ == "__main__":  # not when a writer process (spawn) imports this module
    main()
