"""The provider-side GPU agent daemon."""
