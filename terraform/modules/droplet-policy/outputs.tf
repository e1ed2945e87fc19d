output "policy" {
  description = "The policy document (HCL) for vault_policy."
  value       = local.policy
}
