from ..integrations.launch import run_main
from .loop import main

run_main(main)
