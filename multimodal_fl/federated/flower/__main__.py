"""``python -m multimodal_fl.federated.flower SPEC``: run one site worker (:mod:`.worker`).

The ClientApp starts it (run config ``site-worker = true``) with the path of the start-up spec
it wrote; not meant to be run by hand. The entry point lives here rather than in
:mod:`.worker` so that running it does not import the worker module twice (the package, which
``python -m`` imports first, imports the worker through :mod:`.apps`).
"""

from multimodal_fl.federated.flower.worker import worker_main

if __name__ == "__main__":
    worker_main()
