"""Real PBXes in the loop: a real Asterisk / FreeSWITCH on loopback, real SIP calls from sipp,
the real ``billing-agent run`` (see lab.py and README.md beside it)."""
