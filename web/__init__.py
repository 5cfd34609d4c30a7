"""The top layer: the Flask app (JSON API under ``/v1`` and the HTML UI), its job kinds,
and the ``idvault`` command line."""
