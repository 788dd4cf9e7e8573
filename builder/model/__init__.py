"""The model tier (runs in the image build stage, and on the host): fetch, merge, convert."""
