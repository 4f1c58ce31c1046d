# One image for the bot and its GPU workers (docker-compose.yml). PyPI's Linux x86_64 wheel of torch 2.13.0
# carries its own CUDA runtime, so the workers need only the NVIDIA driver and the container toolkit on the host.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 libopus0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-data.txt ./
RUN pip install --no-cache-dir -r requirements.txt && pip install --no-cache-dir --no-deps -r requirements-data.txt
COPY bot.py ./
COPY cogs ./cogs
COPY mtm_bot ./mtm_bot
# Models come from the Hugging Face cache volume: `docker compose run --rm worker-0 python -m mtm_bot download`
CMD ["python", "bot.py"]
