"""A small web app that shows authsessions at work: sign-in, session data and "Your devices".

Run it with ``authsessions demo`` (needs ``pip install 'authsessions[cli]'``), or
build it yourself::

    from authsessions.demo.app import create_app

    app = create_app("sqlite:///sessions.db")   # serve with uvicorn

This package stays free of imports so the command line can use its helpers
without loading the web stack.
"""
