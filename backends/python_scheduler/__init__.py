"""The online scheduler (import path ``tcsched.scheduler``, folder backends/python_scheduler/): the policy that
picks a variant per request (``policy``), live load and upstream-time tracking (``live``) and the request
one ``execute`` call of the scheduler model as plain Python (``service``); ``triton_models/`` holds the thin ``model.py``
files that Triton loads. It never imports the build or the clients."""
