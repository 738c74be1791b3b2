// Package region holds what every tier agrees a region is: its name.
package region

import (
	"errors"
	"fmt"
)

// ErrInvalidName is wrapped by ValidName's errors.
var ErrInvalidName = errors.New("region: invalid name")

// ValidName reports whether name is a valid region name: 1 to 63 characters
// of a-z, 0-9 and '-', starting with a letter (^[a-z][a-z0-9-]{0,62}$). The
// error wraps ErrInvalidName.
func ValidName(name string) error {
	if len(name) == 0 || len(name) > 63 {
		return fmt.Errorf("%w: %q must be 1 to 63 characters", ErrInvalidName, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case 'a' <= c && c <= 'z':
		case i > 0 && ('0' <= c && c <= '9' || c == '-'):
		default:
			return fmt.Errorf("%w: %q must match ^[a-z][a-z0-9-]{0,62}$", ErrInvalidName, name)
		}
	}
	return nil
}
