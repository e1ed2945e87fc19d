"""Helpers shared by the tests: real tools (OpenBao, Terraform) started the way a user would."""
