"""``python -m multimodal_fl`` runs the ``mmfl`` command line."""

from multimodal_fl.cli import main

main()
