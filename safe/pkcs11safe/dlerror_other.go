//go:build !unix

package pkcs11safe

// loadError has no detail to offer outside Unix.
func loadError(string) string { return "" }
