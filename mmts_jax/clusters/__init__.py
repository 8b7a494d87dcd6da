"""Host-side preprocessing: the sentence encoder, K-Means and the cluster table."""
