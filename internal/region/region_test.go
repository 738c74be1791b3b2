package region

import (
	"errors"
	"regexp"
	"strings"
	"testing"
)

var grammar = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

func TestValidName(t *testing.T) {
	for _, name := range []string{"us-east", "a", "eu-west-2", "", "US-East", "1east", "-a", "a_b", "a b", "é", strings.Repeat("a", 63), strings.Repeat("a", 64), "a-", "a--b"} {
		err := ValidName(name)
		if got, want := err == nil, grammar.MatchString(name); got != want {
			t.Errorf("ValidName(%q) = %v, want ok=%v", name, err, want)
		}
		if err != nil && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidName(%q) = %v, want it to wrap ErrInvalidName", name, err)
		}
	}
}

func FuzzValidName(f *testing.F) {
	f.Add("us-east")
	f.Fuzz(func(t *testing.T, name string) {
		if got, want := ValidName(name) == nil, grammar.MatchString(name); got != want {
			t.Errorf("ValidName(%q) ok = %v, want %v", name, got, want)
		}
	})
}
