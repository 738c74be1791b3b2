package keysets

import (
	"regexp"
	"strings"
	"testing"
)

// nameGrammar is the documented grammar of keyset names; validName is its
// hand-written form.
var nameGrammar = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62}){0,7}$`)

func TestValidNameMatchesGrammar(t *testing.T) {
	seg63 := "a" + strings.Repeat("b", 62)
	for _, name := range []string{
		"", "a", "0", ".", "_", "-", "a.", "a-b_c.d", "/", "a/", "/a", "a//b", "a/b", "A", "a/B", "é", "a b", "a\x00",
		seg63, seg63 + "c", seg63 + "/" + seg63, "a/.b", "a/-", "a/0",
		strings.Repeat("a/", 7) + "a", strings.Repeat("a/", 8) + "a", strings.Repeat("a/", 7) + seg63, strings.Repeat("a/", 7) + seg63 + "x",
		"payments/ledger", "payments/ledger/", "payments:ledger", "payments\\ledger",
	} {
		if got, want := validName(name), nameGrammar.MatchString(name); got != want {
			t.Errorf("validName(%q) = %v, want %v (the grammar)", name, got, want)
		}
	}
}

func FuzzValidName(f *testing.F) {
	for _, s := range []string{"payments/ledger", "a/b/c/d/e/f/g/h", "a/b/c/d/e/f/g/h/i", "-a", "a..b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if got, want := validName(name), nameGrammar.MatchString(name); got != want {
			t.Errorf("validName(%q) = %v, want %v (the grammar)", name, got, want)
		}
	})
}
