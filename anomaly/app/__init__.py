"""`anostyle serve`: a single-page web interface and JSON API that scores uploaded images.

model.py loads the networks, the evaluation threshold and the validation reference scores;
uploads.py reads multipart uploads in memory under size and pixel limits; access.py says who may
use the server and for how long; server.py is the web application (FastAPI on uvicorn) and
page.html its one page.
"""
