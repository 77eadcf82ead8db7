"""`jaxq scenarios`: list the scenarios found on the config path."""

from .config import config_dirs, list_scenarios, load_scenario


def add_arguments(parser):
    parser.add_argument("--verbose", "-v", action="store_true", help="also print each description")


def run(args) -> int:
    print("config directories: " + ", ".join(str(d) for d in config_dirs()))
    for name in list_scenarios():
        line = name
        if args.verbose:
            try:
                line += f"  {load_scenario(name).description}"
            except ValueError as err:
                line += f"  (invalid: {err})"
        print(line)
    return 0
