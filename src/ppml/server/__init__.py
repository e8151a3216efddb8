"""The service layer: FastAPI apps over the domain services, served by uvicorn with TLS."""
