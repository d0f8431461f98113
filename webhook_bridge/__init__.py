"""The Stripe webhook bridge (SPEC §7): verifies Stripe's signed webhooks and forwards each event to
the payments server's internal HandleStripeEvent RPC, answering 200 only after the server committed it."""
