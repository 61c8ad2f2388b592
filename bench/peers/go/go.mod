module peer_go

go 1.19

require golang.org/x/time v0.3.0

// Offline build against Debian's golang-golang-x-time-dev (0.3.0): never touches the module proxy.
replace golang.org/x/time => /usr/share/gocode/src/golang.org/x/time
