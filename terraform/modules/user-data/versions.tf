terraform {
  # Provider-free on purpose: it only renders text, so it can be initialised, planned and
  # tested offline. 1.3+ for output preconditions and optional attributes.
  required_version = ">= 1.3"
}
