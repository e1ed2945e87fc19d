terraform {
  # Provider-free on purpose: it only renders the policy text, so it can be initialised,
  # applied and tested offline (tests/test_terraform_transit.py loads what it renders into a
  # real OpenBao and runs the agent under it).
  required_version = ">= 1.3"
}
