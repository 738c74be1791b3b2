package serverconfig

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
)

// Checks for Spec.Checks. Their errors complete `SETTING: "VALUE" ...`.

// Optional passes the empty value ("off", "none") and checks any other with
// c.
func Optional(c Check) Check {
	return func(v string) error {
		if v == "" {
			return nil
		}
		return c(v)
	}
}

// BindAddr checks a listen address: host:port with a numeric port in
// 0-65535; the host may be empty or unspecified (every interface) and port
// 0 picks a free one.
func BindAddr(v string) error {
	_, _, err := splitHostPort(v, false)
	return err
}

// PeerAddr checks an address others dial: a host (name or IP, not an
// unspecified one such as 0.0.0.0) and a port in 1-65535. Advertised
// addresses and the addresses of peers are checked with it.
func PeerAddr(v string) error {
	_, _, err := splitHostPort(v, true)
	return err
}

// PeerAddrList checks a comma-separated list of PeerAddr, at least one,
// none twice.
func PeerAddrList(v string) error {
	var seen []string
	for _, a := range strings.Split(v, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if err := PeerAddr(a); err != nil {
			return fmt.Errorf("lists %q, which %v", a, err)
		}
		if slices.Contains(seen, a) {
			return fmt.Errorf("lists %q twice", a)
		}
		seen = append(seen, a)
	}
	if len(seen) == 0 {
		return errors.New("lists no address")
	}
	return nil
}

// OneOf checks that the value is one of values.
func OneOf(values ...string) Check {
	return func(v string) error {
		if slices.Contains(values, v) {
			return nil
		}
		return fmt.Errorf("is not one of %s", strings.Join(values, ", "))
	}
}

// Unspecified reports whether a listen address binds every interface (an
// empty host, 0.0.0.0 or ::), so it is no address others can dial.
func Unspecified(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsUnspecified()
}

func splitHostPort(v string, dialable bool) (string, int, error) {
	host, portStr, err := net.SplitHostPort(v)
	if err != nil {
		return "", 0, errors.New("is not a host:port")
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return "", 0, fmt.Errorf("is not a host:port (port %q is not a number)", portStr)
	}
	if port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("is not a host:port (port %d is not in 0-65535)", port)
	}
	if strings.ContainsAny(host, " /,") {
		return "", 0, fmt.Errorf("is not a host:port (host %q)", host)
	}
	if dialable {
		if host == "" || Unspecified(v) {
			return "", 0, errors.New("is not an address others can reach (an empty or unspecified host binds every interface; give a host name or IP)")
		}
		if port == 0 {
			return "", 0, errors.New("is not an address others can reach (port 0)")
		}
	}
	return host, port, nil
}
