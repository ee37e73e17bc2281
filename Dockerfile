# The one image of the demo: workers, beat, Flower and the client all run from it.
#
#     docker compose build        # or: docker build -t celery-demo .
#
# Python 3.11, as on the machines where the README's numbers were measured.
FROM python:3.11-slim

# No .pyc files in the image, and log lines reach `docker compose logs` at once.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

# A worker running as root can be made to run code as root (Celery warns about it).
# The code stays owned by root, so the app user can read it but not change it.
RUN useradd --create-home --uid 1000 celery
COPY . .
USER celery

CMD ["celery", "-A", "tasks", "worker", "-l", "INFO"]
